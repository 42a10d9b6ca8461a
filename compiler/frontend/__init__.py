"""Frontends: where weights and graphs enter the compiler."""
