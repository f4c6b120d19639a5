// Placeholder: filled in by the NBD work.
