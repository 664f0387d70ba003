"""What both processes share: wire messages, transport, config, data, model zoo, metrics."""
