// Placeholder: filled in by the QMP work.
