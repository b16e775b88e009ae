"""dicomflow: DICOM studies to a de-identified data set, a trained CNN and a registered model."""
