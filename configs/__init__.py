"""vlp's presets (`--config NAME`), shipped as package data `vlp.configs`."""
