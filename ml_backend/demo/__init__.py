"""`medebiaser demo`: synthetic chest X-rays, a local Label Studio and this backend, wired together."""
