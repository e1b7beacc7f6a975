"""Evaluation of frozen and finetuned encoders (k-NN now; linear probe and finetuning to come)."""
