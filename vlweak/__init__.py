"""vlweak: vision-language weak supervision on PyTorch Lightning."""

from vlweak.noise import quiet_known_noise

quiet_known_noise()
