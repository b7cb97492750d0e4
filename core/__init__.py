"""The science of UMCD: datasets, CSQ models, hash centres, training, index, criteria, calibration, detection."""
