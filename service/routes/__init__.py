"""One router per resource: health, models (management), inference (KServe v2)."""
