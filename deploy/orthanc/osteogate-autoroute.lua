-- OsteoGate auto-routing for Orthanc (deploy/orthanc/; tested by tests/test_orthanc_recipe.py).
--
-- When a study is stable (no new instance for StableAge seconds), forward its knee and spine
-- CR/DX series to the DICOM modality "OSTEOGATE" (DicomModalities in orthanc.json). OsteoGate
-- sends its results (the SR and the result card, Manufacturer "OsteoGate") back into the same
-- study; those series are never forwarded. A series is forwarded again only when it has grown
-- since (new images: OsteoGate then makes a new result version), so our results arriving, which
-- makes the study stable once more, send nothing.
--
-- A forward that fails (OsteoGate down) stays in Orthanc's job list as failed: resubmit it with
-- POST /jobs/<id>/resubmit (Orthanc Explorer: Jobs), or send the series by hand.

local TARGET = 'OSTEOGATE'                 -- key of the gateway in DicomModalities
local OWN_MANUFACTURER = 'OsteoGate'       -- Manufacturer of OsteoGate's SR and result card
local MARK = 'OsteoGateForwarded'          -- series metadata (declared in UserMetadata)
local MODALITIES = { CR = true, DX = true }
-- BodyPartExamined defined terms (PS3.16 Annex L) OsteoGate assesses; the gateway decides
-- again from the full header (gateway/region.py), this only keeps other films at home.
local BODY_PARTS = {
  KNEE = true, SPINE = true, CSPINE = true, TSPINE = true, LSPINE = true, SSPINE = true,
  TLSPINE = true, LUMBARSPINE = true,
}
-- Without BodyPartExamined: words in the series or study description.
local KEYWORDS = { 'knee', 'spine', 'lumbar', 'thoracic', 'vertebra' }

local function clean(value)
  return ((value or ''):gsub('^%s+', ''):gsub('%s+$', ''))
end

local function in_scope(series, study)
  local tags = series['MainDicomTags']
  if clean(tags['Manufacturer']) == OWN_MANUFACTURER then
    return false
  end
  if not MODALITIES[clean(tags['Modality']):upper()] then
    return false
  end
  local part = clean(tags['BodyPartExamined']):upper():gsub(' ', '')
  if part ~= '' then
    return BODY_PARTS[part] == true
  end
  local text = (clean(tags['SeriesDescription']) .. ' ' ..
                clean(study['MainDicomTags']['StudyDescription'])):lower()
  for _, word in ipairs(KEYWORDS) do
    if text:find(word, 1, true) then
      return true
    end
  end
  return false
end

local function forwarded_count(seriesId)
  -- Absent metadata is an HTTP 404 inside Orthanc: an error in Lua, hence pcall.
  local ok, value = pcall(RestApiGet, '/series/' .. seriesId .. '/metadata/' .. MARK)
  if ok and value ~= nil then
    return value
  end
  return ''
end

function OnStableStudy(studyId, tags, metadata)
  local study = ParseJson(RestApiGet('/studies/' .. studyId))
  local resources = {}
  for _, seriesId in ipairs(study['Series']) do
    local series = ParseJson(RestApiGet('/series/' .. seriesId))
    if in_scope(series, study) then
      local count = tostring(#series['Instances'])
      if forwarded_count(seriesId) ~= count then
        table.insert(resources, seriesId)
        RestApiPut('/series/' .. seriesId .. '/metadata/' .. MARK, count)
      end
    end
  end
  if #resources > 0 then
    -- Asynchronous: a job, so a slow peer never blocks Orthanc's Lua engine.
    local job = ParseJson(RestApiPost('/modalities/' .. TARGET .. '/store',
      DumpJson({ Resources = resources, Asynchronous = true }, true)))
    print('OsteoGate: forwarding ' .. #resources .. ' series of study ' .. studyId ..
          ' (job ' .. job['ID'] .. ')')
  end
end
