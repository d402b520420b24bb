"""Serving: inference flavours of a trained model, their parity checks, and the online service."""
