"""Synthetic phantoms and DICOM readers used for training and benchmarks."""
