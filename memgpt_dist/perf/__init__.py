"""Performance accounting: model FLOPs from the config, device peaks, throughput and MFU."""
