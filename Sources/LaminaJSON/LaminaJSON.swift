// Placeholder: filled in by the JSON work.
