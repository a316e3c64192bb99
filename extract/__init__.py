"""vlkd.extract"""
