"""Client-side tools for the MedSAM MONAI Label app: start a real server, measure it over HTTP."""
