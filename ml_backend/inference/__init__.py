"""What serving (``serve/``) and ranking (``rank/``) share: loading task images within the request's bounds,
running the model once per batch, and turning its outputs into Label Studio result items."""
