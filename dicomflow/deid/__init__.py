"""deid"""
