"""allm's modality managers, one subpackage each, run by kernel.runtime."""
