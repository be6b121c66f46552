"""Data layer: cases, readers, phantoms, splits, the 2D slice loader."""
