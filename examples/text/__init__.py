"""An intent classifier on the MiniLM sentence encoder: convert, evaluate, optimize to int8,
distill to a smaller transformer, deploy to two agents, retrain the head and roll it out."""
