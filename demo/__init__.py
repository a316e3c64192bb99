"""vlkd.demo"""
