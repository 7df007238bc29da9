"""Training / evaluation / prediction / export engines of the Paddle twins."""
