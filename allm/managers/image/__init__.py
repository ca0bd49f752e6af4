"""The image manager: stable-diffusion.cpp, text to image, in a worker process of its own."""
