"""vlkd.common: the region-set format (writer, reader, manifest, validation), sharding and
array-job indices. Depends only on numpy, h5py, zarr and the standard library."""
