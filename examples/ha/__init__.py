"""High availability: a producer fails over between two brokers; one worker consumes from both."""
