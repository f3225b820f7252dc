"""Reading and writing images and data sets."""
