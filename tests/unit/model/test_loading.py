"""Checkpoint discovery: heads, overrides, normalisation and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from rmserve.model import InvalidRequestError, ModelLoadError, load_reward_model


def test_missing_head_names_the_tensors_found(checkpoint_factory, tmp_path):
    src, _, _ = checkpoint_factory("reward_head")
    dst = tmp_path / "nohead"
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    del weights["reward_head.weight"]
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as info:
        load_reward_model(str(dst), device="cpu", dtype="fp32")
    assert "lm_head.weight" in info.value.message and "model.norm.weight" in info.value.message


def test_explicit_head_override(checkpoint_factory, tmp_path):
    src, _, _ = checkpoint_factory("reward_head")
    dst = tmp_path / "two-heads"
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    weights["value_head.weight"] = -weights["reward_head.weight"]
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    items = [{"text": "Owls are wise."}]
    a = load_reward_model(str(dst), device="cpu", dtype="fp32", head="reward_head").score(items)[0]
    b = load_reward_model(str(dst), device="cpu", dtype="fp32", head="value_head").score(items)[0]
    assert b == pytest.approx(-a, abs=1e-5) and abs(a) > 1e-3
    with pytest.raises(ModelLoadError, match="v_head"):
        load_reward_model(str(dst), device="cpu", dtype="fp32", head="v_head")


def test_separate_head_file_argument(checkpoint_factory, tmp_path):
    src, _, _ = checkpoint_factory("v_head_file")
    dst = tmp_path / "headfile"
    shutil.copytree(src, dst)
    (dst / "v_head.safetensors").rename(dst / "my_head.safetensors")
    with pytest.raises(ModelLoadError):
        load_reward_model(str(dst), device="cpu", dtype="fp32")
    want = load_reward_model(str(src), device="cpu", dtype="fp32").score([{"text": "Owls."}])
    got = load_reward_model(str(dst), device="cpu", dtype="fp32", head_file="my_head.safetensors").score(
        [{"text": "Owls."}]
    )
    assert got == pytest.approx(want, abs=1e-6)


def test_wrong_head_shape_is_rejected(checkpoint_factory, tmp_path):
    src, _, _ = checkpoint_factory("score")
    dst = tmp_path / "twolabels"
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    weights["score.weight"] = weights["score.weight"].repeat(2, 1)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="expected \\(1, 32\\)"):
        load_reward_model(str(dst), device="cpu", dtype="fp32")


def test_missing_backbone_weights_are_an_error_not_random_init(checkpoint_factory, tmp_path):
    src, _, _ = checkpoint_factory("score")
    dst = tmp_path / "partial"
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="up_proj"):
        load_reward_model(str(dst), device="cpu", dtype="fp32")


def test_bad_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_reward_model(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no weights .* model.safetensors, pytorch_model.bin"):
        load_reward_model(str(tmp_path))


class TrainerState:
    """An object a trainer might pickle beside its weights (not a tensor)."""


def as_bin_checkpoint(src, dst, shards: int) -> None:
    """``src``'s checkpoint with its ``model.safetensors`` as PyTorch ``.bin`` file(s) (``torch.save``, as older
    trainers write them): one ``pytorch_model.bin``, or ``shards`` files and their index."""
    import torch

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    if shards == 1:
        torch.save(weights, dst / "pytorch_model.bin")
        return
    keys = sorted(weights)
    weight_map = {}
    for k in range(shards):
        name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {key: weights[key] for key in keys[k::shards]}
        torch.save(part, dst / name)
        weight_map.update(dict.fromkeys(part, name))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("head_format", ["score", "reward_head", "value_head"])
def test_pytorch_bin_weights_give_the_same_rewards(checkpoint_factory, tmp_path, head_format, shards):
    """A checkpoint whose weights are ``pytorch_model.bin`` (or shards and an index) instead of safetensors: the
    backbone and the head are read from them (weights-only: tensors, no code), rewards as from safetensors."""
    path, ref, tok = checkpoint_factory(head_format)
    as_bin_checkpoint(path, tmp_path / "bin", shards)
    items = [{"prompt": "Tell me about owls.", "response": r} for r in ("Gladly! They hunt at night.", "No.")]
    expected = load_reward_model(str(path), device="cpu", dtype="fp32").score(items)
    got = load_reward_model(str(tmp_path / "bin"), device="cpu", dtype="fp32").score(items)
    assert got == pytest.approx(expected, abs=1e-6)


def test_a_deepspeed_chat_reward_model_directory(checkpoint_factory, tmp_path):
    """What DeepSpeed-Chat's ``save_hf_format`` writes for a reward model: ``torch.save`` of its ``RewardModel``'s
    state dict (the decoder under ``rwtranrsformer.``, the head as ``v_head.weight``) beside the decoder's config.
    Rewards are the same checkpoint's as a ``score`` model."""
    import torch

    path, ref, tok = checkpoint_factory("score")
    dst = tmp_path / "ds-chat"
    as_bin_checkpoint(path, dst, 1)
    weights = torch.load(dst / "pytorch_model.bin", weights_only=True)
    renamed = {("rwtranrsformer." + k.removeprefix("model.")): v for k, v in weights.items() if k.startswith("model.")}
    torch.save({**renamed, "v_head.weight": weights["score.weight"]}, dst / "pytorch_model.bin")
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaModel"]}))
    items = [{"prompt": "Tell me about owls.", "response": r} for r in ("Gladly! They hunt at night.", "No.")]
    rm = load_reward_model(str(dst), device="cpu", dtype="fp32")
    assert rm.info()["head"] == "v_head"
    assert rm.score(items) == pytest.approx(
        load_reward_model(str(path), device="cpu", dtype="fp32").score(items), abs=1e-6
    )


def test_a_bin_file_that_holds_more_than_tensors_is_refused(checkpoint_factory, tmp_path):
    """torch's weights-only unpickler refuses a pickle with other objects in it (it could run code): a load error
    naming the file, not a backbone of random weights."""
    import torch

    path, _ref, _tok = checkpoint_factory("score")
    as_bin_checkpoint(path, tmp_path / "bin", 1)
    weights = torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True)
    torch.save({**weights, "trainer_state": TrainerState()}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin"):
        load_reward_model(str(tmp_path / "bin"), device="cpu", dtype="fp32")


@pytest.mark.parametrize(
    ("keys", "mean", "std"),
    [({"mean": 1.5, "std": 2.0}, 1.5, 2.0), ({"reward_mean": -1.0, "reward_std": 0.5}, -1.0, 0.5)],
)
def test_normalisation_from_config(checkpoint_factory, tmp_path, keys, mean, std):
    src, _, _ = checkpoint_factory("score")
    dst = tmp_path / "norm"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(keys)
    (dst / "config.json").write_text(json.dumps(config))
    rm = load_reward_model(str(dst), device="cpu", dtype="fp32")
    items = [{"text": "Owls are wise."}, {"text": "Bees."}]
    raw = rm.score(items)
    assert rm.score(items, normalize=True) == pytest.approx([(r - mean) / std for r in raw], abs=1e-6)
    assert rm.info()["normalization"] == {"mean": mean, "std": std}
    spec_override = load_reward_model(str(dst), device="cpu", dtype="fp32", reward_mean=0.0, reward_std=4.0)
    assert spec_override.score(items, normalize=True) == pytest.approx([r / 4.0 for r in raw], abs=1e-6)


def test_normalize_without_statistics_is_a_clear_error(checkpoint_factory):
    rm = load_reward_model(str(checkpoint_factory("score")[0]), device="cpu", dtype="fp32")
    assert rm.info()["normalization"] is None
    with pytest.raises(InvalidRequestError, match="no normalisation"):
        rm.score([{"text": "x"}], normalize=True)


def test_raw_rewards_by_default_no_sigmoid(demo_model):
    rewards = demo_model.score(
        [
            {"prompt": "Tell me about owls.", "response": "Gladly! Owls have a long history."},
            {"prompt": "Tell me about owls.", "response": "Go away."},
        ]
    )
    assert rewards[0] > 1.0 and rewards[1] < 0.0  # outside (0, 1): not squashed


def test_demo_model_report(demo_model_dir, demo_model):
    from rmserve.model.demo import demo_report, heldout_pairs, pairwise_accuracy

    report = demo_report()
    assert report["heldout_pairwise_accuracy"] >= 0.90
    assert pairwise_accuracy(demo_model, heldout_pairs(200)) >= 0.90
    assert demo_model.info()["template"] == "chat" and demo_model.head_name == "reward_head"


def test_auto_dtype_rule():
    import torch

    from rmserve.model.loading import cpu_has_bf16_units, resolve_dtype

    assert resolve_dtype("auto", torch.device("cuda")) == "bf16"
    assert resolve_dtype("auto", torch.device("cpu")) == ("bf16" if cpu_has_bf16_units() else "fp32")
    assert resolve_dtype("fp16", torch.device("cpu")) == "fp16"


def test_cpu_prefix_cache_takes_a_tenth_of_the_memory_a_container_allows(monkeypatch, tmp_path):
    import os

    import torch

    from rmserve.model import checkpoint, host

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(host, "CGROUP_MEMORY_LIMITS", (str(tmp_path / "absent"),))
    assert host.host_memory_bytes() == ram
    assert checkpoint.resolve_prefix_cache_bytes(None, torch.device("cpu")) == max(1 << 30, ram // 10)
    limit = tmp_path / "memory.max"
    limit.write_text(f"{20 << 30}\n")  # a container limited to 20 GiB (on this machine, or below its RAM)
    monkeypatch.setattr(host, "CGROUP_MEMORY_LIMITS", (str(tmp_path / "absent"), str(limit)))
    assert host.host_memory_bytes() == min(ram, 20 << 30)
    limit.write_text("max\n")  # cgroup v2: no limit
    assert host.host_memory_bytes() == ram
    limit.write_text(f"{4 << 30}\n")  # a small container: never under 1 GiB
    assert checkpoint.resolve_prefix_cache_bytes(None, torch.device("cpu")) == max(1 << 30, min(ram, 4 << 30) // 10)
    assert checkpoint.resolve_prefix_cache_bytes(12345, torch.device("cpu")) == 12345  # what the config asks for


def test_a_demo_cache_that_cannot_be_written_is_a_clear_error(tmp_path):
    """The demo model is built on first use; where its cache directory cannot be created (here a file is in the way;
    a read-only mount fails alike) the error names the directory and RMSERVE_CACHE_DIR, not a bare OSError."""
    from rmserve.model.demo import ensure_demo_model

    (tmp_path / "a-file").write_text("")
    with pytest.raises(ModelLoadError, match=r"a-file/cache, which cannot be written .*RMSERVE_CACHE_DIR"):
        ensure_demo_model(tmp_path / "a-file" / "cache")
