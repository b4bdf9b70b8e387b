"""Full-model recipes (ALIP, ALIGN): scripts run as `python recipes/NAME.py --config ...` or `sail recipe NAME`."""
