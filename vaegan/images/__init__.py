"""Images in: reading files and datasets, crops, aspect buckets, conversions, JPEG decoding on the device."""
