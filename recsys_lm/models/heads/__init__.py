"""Heads: one module each, chosen by `_target_` in conf/head/*.yaml."""
