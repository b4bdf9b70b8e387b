"""What every layer uses: errors, atomic artifacts and locks, where a run is (directory or Hub id),
the device, precision and process group, the retrieval and zero-shot metrics, and the old-name aliases
(moved.py).
"""
