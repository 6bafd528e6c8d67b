"""Everything that turns a model and a data stream into trained parameters."""
