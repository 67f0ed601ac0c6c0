"""The control plane: tasks, program artifacts and canaries, written to their compacted topics."""
