"""dicom"""
