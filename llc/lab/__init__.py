"""The phone lab: emulated Android phones for llc deploy without phones."""
