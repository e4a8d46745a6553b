"""Using a trained model: prediction on your own images, internal maps, the local demo."""
