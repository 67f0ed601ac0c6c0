"""The contract with the outside world: record models, their codecs, the topic registry and the files behind them."""
