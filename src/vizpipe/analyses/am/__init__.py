"""Composable parts of activation maximization: how the model is run up to a layer,
what is maximized, how the image is parameterized, and what is done to it."""
