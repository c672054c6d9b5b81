"""Plain classification: the static reference every dynamic technique is compared against."""
