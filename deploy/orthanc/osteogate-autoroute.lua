-- OsteoGate auto-routing for Orthanc (deploy/orthanc/; tested by tests/test_orthanc_recipe.py).
--
-- When a study is stable (no new instance for StableAge seconds), forward its knee and spine
-- CR/DX series to the DICOM modality "OSTEOGATE" (DicomModalities in orthanc.json). OsteoGate
-- sends its results (the SR and the result card, Manufacturer "OsteoGate") back into the same
-- study; those series are never forwarded. A series is forwarded again only when it has grown
-- since (new images: OsteoGate then makes a new result version), so our results arriving, which
-- makes the study stable once more, send nothing.
--
-- A series is marked forwarded only when its job succeeded. A forward that fails (OsteoGate down
-- or restarting) is resubmitted by this script, after 10 s, then 20, 40... at most every 5 min:
-- on Orthanc >= 1.11.2 from OnHeartBeat (LuaHeartBeatPeriod in orthanc.json), on older ones
-- (Debian 12 ships 1.10) at the next instance Orthanc receives. The normal path logs no error.
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

local FIRST_RETRY, MAX_RETRY = 10, 300     -- seconds between resubmissions of a failed forward

local pending = {}   -- forward job ID -> { [seriesId] = instance count sent }
local retries = {}   -- failed forward job ID -> { due = os.time(), delay = seconds }

local function forwarded_count(seriesId)
  -- All of the series' metadata at once: asking for the one absent key would be an HTTP 404,
  -- which Orthanc logs as an error even when the script expects it.
  local metadata = ParseJson(RestApiGet('/series/' .. seriesId .. '/metadata?expand'))
  return metadata[MARK] or ''
end

local function retry_due()
  local now = os.time()
  for jobId, retry in pairs(retries) do
    if retry.due <= now then
      retry.due = now + retry.delay  -- until OnJobFailure sets the next one
      print('OsteoGate: resubmitting forward job ' .. jobId)
      RestApiPost('/jobs/' .. jobId .. '/resubmit', '')
    end
  end
end

function OnStableStudy(studyId, tags, metadata)
  retry_due()
  local study = ParseJson(RestApiGet('/studies/' .. studyId))
  local resources, counts = {}, {}
  for _, seriesId in ipairs(study['Series']) do
    local series = ParseJson(RestApiGet('/series/' .. seriesId))
    if in_scope(series, study) then
      local count = tostring(#series['Instances'])
      if forwarded_count(seriesId) ~= count then
        table.insert(resources, seriesId)
        counts[seriesId] = count
      end
    end
  end
  if #resources > 0 then
    -- Asynchronous: a job, so a slow peer never blocks Orthanc's Lua engine.
    local job = ParseJson(RestApiPost('/modalities/' .. TARGET .. '/store',
      DumpJson({ Resources = resources, Asynchronous = true }, true)))
    pending[job['ID']] = counts
    print('OsteoGate: forwarding ' .. #resources .. ' series of study ' .. studyId ..
          ' (job ' .. job['ID'] .. ')')
  end
end

function OnJobSuccess(jobId)
  local counts = pending[jobId]
  if counts == nil then
    return  -- not one of our forwards
  end
  pending[jobId], retries[jobId] = nil, nil
  for seriesId, count in pairs(counts) do
    RestApiPut('/series/' .. seriesId .. '/metadata/' .. MARK, count)
  end
end

function OnJobFailure(jobId)
  if pending[jobId] == nil then
    return
  end
  local previous = retries[jobId]
  local delay = previous and math.min(previous.delay * 2, MAX_RETRY) or FIRST_RETRY
  retries[jobId] = { due = os.time() + delay, delay = delay }
  print('OsteoGate: forward job ' .. jobId .. ' failed (is OsteoGate up?); resubmitted in ' ..
        delay .. ' s')
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  retry_due()
end

function OnHeartBeat()
  retry_due()
end
