"""The digits profile's generator, trained here on scikit-learn's digits (stage digits-assets; docs/digits.md)."""
