"""Which served model or ensemble a request names, and how an ensemble combines its members."""
