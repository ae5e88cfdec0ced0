"""The in-process runtime: the HTTP edge and every served model's scoring core and engine in one plain process, no
Ray (``rmserve serve --runtime inprocess``)."""
