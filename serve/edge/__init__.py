"""The HTTP edge: routes, request and response bodies, endpoints' pre- and post-processing, errors."""
