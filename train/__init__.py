"""vlkd.train"""
