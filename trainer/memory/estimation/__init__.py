"""What a run costs: traced steps, fitted profiles, peak memory and step time, measured peaks, devices."""
