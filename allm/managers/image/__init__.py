"""The image manager: stable-diffusion.cpp text to image (arrives with its issue)."""
