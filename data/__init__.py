"""vlkd.data"""
