"""The foundation every role builds on: the record schema, the stage protocol, config reading,
the stage registry, the LLM seam and model preparation. Imports nothing above it."""
