"""The stages of the loop (prompts, generate, score, filter, train, publish, evaluate, export) and the engine that runs them for both front ends."""
