"""Job-side glue for Hydra launchers: what each multirun job holds and leaves behind."""
