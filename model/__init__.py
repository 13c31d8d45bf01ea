"""The Moshi language model, its generation loop and the shared transformer blocks."""
