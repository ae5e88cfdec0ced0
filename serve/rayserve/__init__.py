"""The Ray Serve runtime: Gateway and Scorer deployments, merged calls, prefix-affinity routing, autoscaling, the
metrics hub, graceful shutdown and ``rmserve serve``'s Ray runner."""
