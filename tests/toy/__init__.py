"""A head for a new task, written entirely in the test folder: proof that adding one takes
a head module (bag_head.py), a task record (task.py) and a YAML (conf/head/bag.yaml)."""
